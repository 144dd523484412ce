"""The `meshforge` command: parses each verb and calls the one function of the package that owns the work."""

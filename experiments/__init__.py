"""Experiment files: one `get_config()` each. Run with `meshforge train experiments/NAME.py`."""

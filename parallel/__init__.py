"""Device meshes, the logical-to-mesh sharding rules, and multi-host start-up."""

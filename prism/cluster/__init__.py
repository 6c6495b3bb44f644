"""The cluster layer, under the server and the simulator alike: the system config, the registry
of systems, cluster control (global placement, activation, migration) and the device links."""

"""Clients that drive a running Prism server over HTTP: the open-loop replay client, real
sweeps over systems, the demo session, and starting a server in a child process."""

"""Training of the bundled LMs, the PRM and the router (torch only here)."""

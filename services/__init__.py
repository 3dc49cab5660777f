"""Ray Serve deployments (model pools, coordinator), the app builder, and wire formats.

Import ``services.app:build_app`` to build the application; nothing runs at import time.
"""

"""The HTTP API of fedhub: `create_app(settings, runtime)` in `services.api.main`, routes per resource."""

"""The REST API under ``/v1``: routers by resource; ``service.app.create_app`` assembles them."""

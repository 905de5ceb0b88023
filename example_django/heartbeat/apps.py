from django.apps import AppConfig


class HeartbeatConfig(AppConfig):
    name = "example_django.heartbeat"
    default_auto_field = "django.db.models.BigAutoField"

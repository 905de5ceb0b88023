"""App ``tenant_a`` (see tests/apps/tenant.py)."""

from tests.apps.tenant import make_app

app = make_app("tenant_a")

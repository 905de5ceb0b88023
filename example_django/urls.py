"""The admin, where periodic tasks are added, changed and disabled (``/admin/``)."""

from django.contrib import admin
from django.urls import path

urlpatterns = [path("admin/", admin.site.urls)]

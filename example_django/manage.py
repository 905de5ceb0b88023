#!/usr/bin/env python
"""Django's command line for example_django: ``python example_django/manage.py migrate``.

Run from anywhere: the repository root (the directory that holds
``example_django/``) is put first on ``sys.path`` in place of this file's own
directory, where ``example_django/celery_app.py`` and friends would otherwise
shadow top-level modules.
"""

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_django.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)

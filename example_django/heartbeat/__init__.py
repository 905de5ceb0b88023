"""A Django app with one periodic task, ``heartbeat``, that records each run in the database."""

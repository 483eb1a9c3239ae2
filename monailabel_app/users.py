"""Manage the users file of ``--conf auth_users``, e.g. ``python -m monailabel_app.users --file users.json add alice``.

Run from the repository root; the store itself is :mod:`monailabel_app.lib.users`.
"""

from monailabel_app.lib.users import main

if __name__ == "__main__":
    raise SystemExit(main())

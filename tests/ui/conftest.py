"""The web-app tests' shared fixture: ``fake_library`` (defined in test_ui.py) for every
test module in this folder."""
from test_ui import fake_library  # noqa: F401

"""Old name of `helpers` (not a test module), kept until every test imports helpers."""
from helpers import *  # noqa: F401,F403  pylint: disable=wildcard-import,unused-wildcard-import

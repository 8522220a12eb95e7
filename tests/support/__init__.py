"""Helpers the tests import (``from tests.support.<module> import ...``); no tests here."""

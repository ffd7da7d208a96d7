"""Editable-install shim: ``kvtriton.<part>`` resolves to ``<checkout>/<part>``.

Only a development install (``pip install -e .``) puts ``scripts/editable`` on
``sys.path``. A built wheel maps build/, backend/ and client/ onto
kvtriton.build, kvtriton.backend and kvtriton.client instead, and never
installs this file.
"""

import os

__path__ = [os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))]

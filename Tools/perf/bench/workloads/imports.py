# A second run would find them in sys.modules: time each run in a fresh
# process.
ONCE_PER_PROCESS = True

PACKAGES = ["json", "decimal", "asyncio", "unittest", "email.mime.text",
            "http.client", "xml.dom.minidom", "logging.handlers",
            "argparse", "csv", "dataclasses", "sqlite3", "urllib.request",
            "concurrent.futures", "tomllib", "zipfile"]


def run():
    for name in PACKAGES:
        __import__(name)

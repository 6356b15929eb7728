"""Test sink: an SMTP server (aiosmtpd) on port 2525 and an HTTP server on port 8080
that keep every message they receive as a JSON file (what arrived, and when) under
<folder>/mail and <folder>/webhook."""

import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from aiosmtpd.controller import Controller

FOLDER = sys.argv[1]
LOCK = threading.Lock()


def keep(kind: str, record: dict):
    with LOCK:
        folder = os.path.join(FOLDER, kind)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{time.time():.6f}.json")
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            json.dump(record, handle)
        os.rename(path + ".tmp", path)


class Mail:
    async def handle_DATA(self, server, session, envelope):
        keep(
            "mail",
            {
                "received_at": time.time(),
                "from": envelope.mail_from,
                "to": envelope.rcpt_tos,
                "content": envelope.content.decode("utf-8", "replace"),
            },
        )
        return "250 OK"


class Webhook(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        keep(
            "webhook",
            {"received_at": time.time(), "path": self.path, "body": body.decode("utf-8", "replace")},
        )
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


controller = Controller(Mail(), hostname="0.0.0.0", port=2525)  # noqa: S104 - the test network
controller.start()
ThreadingHTTPServer(("0.0.0.0", 8080), Webhook).serve_forever()  # noqa: S104

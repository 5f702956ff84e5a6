"""The baseline for bench/framework_wrk.py: a bare Flask route returning the same JSON."""

from flask import Flask, jsonify

app = Flask("bare")


@app.route("/services/ping", methods=["GET", "POST"])
def ping():
    return jsonify({"ok": True})

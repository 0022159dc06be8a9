"""The HTML status dashboard (placeholder rendering; see issue 5 for the full page)."""
import html
import json


def render_html(data) -> str:
    rows = []
    for name, upstream in data["upstreams"].items():
        for server in upstream["servers"]:
            rows.append("<tr>" + "".join(f"<td>{html.escape(str(server[k]))}</td>" for k in (
                "server", "state", "weight", "active", "tunnels", "requests", "failures",
                "bytes_in", "bytes_out")) + f"<td>{html.escape(name)}</td></tr>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>mplb status</title>"
            "</head><body><h1>mplb</h1><table id='servers'><tr><th>server</th><th>state</th>"
            "<th>weight</th><th>active</th><th>tunnels</th><th>requests</th><th>failures</th>"
            "<th>bytes in</th><th>bytes out</th><th>upstream</th></tr>" + "".join(rows) +
            "</table><pre id='raw'>" + html.escape(json.dumps(data, indent=1)) +
            "</pre></body></html>")

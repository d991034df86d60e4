"""A real MCP client (PyPI `mcp` 2.3.0, not written here) driving ICE's gateway for the tests.

usage: agent.py --stdio PROGRAM ARG... | --url URL [--token TOKEN]
                [--mode legacy|2026-07-28|auto] [--elicit approve|deny|none]
                [--client-name NAME]   < script.json

The script is a JSON list of steps: {"op": "list"} or
{"op": "call", "name": N, "args": {...}, "intent": "..."} or {"op": "sleep", "s": 0.5}.
Prints one JSON document: the negotiated protocol version and each step's result
({"tools": [...]}, {"result": CallToolResult}, or {"error": {"code", "message"}}).
"""

import argparse
import asyncio
import json
import sys

from mcp import Client, types
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--url")
    p.add_argument("--token", help="sent as Authorization: Bearer TOKEN (HTTP only)")
    p.add_argument("--mode", default="auto")
    p.add_argument("--elicit", default="none")
    p.add_argument("--client-name", help="the name the client gives itself (clientInfo)")
    p.add_argument("--stdio", nargs=argparse.REMAINDER)
    return p.parse_args()


async def main():
    a = parse()
    script = json.load(sys.stdin)
    elicited = []

    async def on_elicit(context, params):
        elicited.append(params.message)
        if a.elicit == "approve":
            return types.ElicitResult(action="accept", content={"approve": True, "reason": "test user says yes"})
        if a.elicit == "deny":
            return types.ElicitResult(action="accept", content={"approve": False, "reason": "test user says no"})
        return types.ElicitResult(action="decline")

    if a.url and a.token:
        headers = {"Authorization": f"Bearer {a.token}"}
        server = streamable_http_client(a.url, http_client=create_mcp_http_client(headers=headers))
    elif a.url:
        server = a.url
    else:
        server = StdioServerParameters(command=a.stdio[0], args=a.stdio[1:])
    kwargs = {"mode": a.mode, "cache": None}
    if a.elicit != "none":
        kwargs["elicitation_callback"] = on_elicit
    if a.client_name:
        kwargs["client_info"] = types.Implementation(name=a.client_name, version="0")
    out = {"steps": []}
    async with Client(server, **kwargs) as client:
        out["protocol_version"] = client.protocol_version
        for step in script:
            op = step["op"]
            try:
                if op == "list":
                    r = await client.list_tools()
                    out["steps"].append({"tools": [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in r.tools]})
                elif op == "call":
                    meta = {"ice/intent": step["intent"]} if "intent" in step else None
                    r = await client.call_tool(step["name"], step.get("args", {}), meta=meta)
                    out["steps"].append({"result": r.model_dump(mode="json", by_alias=True, exclude_none=True)})
                elif op == "sleep":
                    await asyncio.sleep(step["s"])
                    out["steps"].append({})
            except MCPError as e:
                out["steps"].append({"error": {"code": e.error.code, "message": e.error.message}})
        # Reported before the session is closed: a server that stopped cannot take the close.
        out["elicited"] = elicited
        print(json.dumps(out), flush=True)


asyncio.run(main())

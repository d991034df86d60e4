"""A misbehaving MCP tool server over stdio, for ICE's tests of its MCP client (ice_effects::mcp).

Built on the official Python SDK (PyPI `mcp` 2.3.0, whose `MCPServer` is v1's FastMCP), so the
wire side is a real third-party implementation; only the tools misbehave:

- `ok(text)`       echoes `text` (annotated read-only: a hint that must not lower ICE's class)
- `pid()`          this process's id (tells a restarted server from the first one)
- `crash()`        exits with status 3 in the middle of the call (annotated destructive)
- `hang()`         never answers; when the client cancels the request it writes `cancelled`
                   to the file named by $FAULTY_CANCEL_MARKER, if set
- `huge(mb)`       answers with `mb` MiB of text (one JSON-RPC line of that size)
- `garbage(text)`  writes a line that is not JSON to the MCP channel, then echoes `text`
- `grow()`         adds a tool `extra` and sends `notifications/tools/list_changed`

Run: python faulty_server.py [--legacy]  (stdio; stderr carries the SDK's logging). By default
the SDK serves whichever era the client opens with (2026-07-28 after `server/discover`, else the
`initialize` handshake); `--legacy` serves the handshake era only, as pre-2026 servers do, so a
`server/discover` probe is refused and the client falls back to `initialize`.
"""

import os
import sys

import anyio
from mcp.server import stdio as _stdio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.runner import serve_loop
from mcp_types import ToolAnnotations

server = MCPServer("faulty")


def _wire_fd() -> int:
    """The descriptor the SDK writes MCP messages to.

    While serving, the SDK points fd 1 at stderr (so stray prints miss the wire) and writes
    through a private duplicate; a tool that wants to corrupt the channel has to find it.
    """
    claim = getattr(_stdio, "_claims", {}).get(1)
    if claim is not None and claim.private_fd is not None:
        return claim.private_fd
    return sys.stdout.fileno()


@server.tool(annotations=ToolAnnotations(readOnlyHint=True))
def ok(text: str) -> str:
    """Echo the text."""
    return text


@server.tool()
def pid() -> int:
    """This server process's id."""
    return os.getpid()


@server.tool(annotations=ToolAnnotations(destructiveHint=True))
def crash() -> str:
    """Die in the middle of the call."""
    sys.stderr.write("faulty: crashing on purpose\n")
    sys.stderr.flush()
    os._exit(3)


@server.tool()
async def hang() -> str:
    """Never answer."""
    try:
        await anyio.sleep_forever()
    finally:
        marker = os.environ.get("FAULTY_CANCEL_MARKER")
        if marker:
            with open(marker, "w") as f:
                f.write("cancelled")
    return "unreachable"


@server.tool()
def huge(mb: int = 5) -> str:
    """Answer with `mb` MiB of text."""
    return "x" * (mb * 1024 * 1024)


@server.tool()
def garbage(text: str) -> str:
    """Corrupt the channel with a non-JSON line, then answer normally."""
    os.write(_wire_fd(), b"this line is not JSON-RPC {{{\n")
    return text


@server.tool()
async def grow(ctx: Context) -> str:
    """Add the tool `extra` and tell the client its tools changed."""

    def extra() -> str:
        """A tool added at run time."""
        return "extra"

    server.add_tool(extra, name="extra")
    await ctx.session.send_tool_list_changed()
    return "grown"


async def serve_legacy() -> None:
    lowlevel = server._lowlevel_server
    async with _stdio.stdio_server() as (read_stream, write_stream):
        async with lowlevel.lifespan(lowlevel) as state:
            await serve_loop(
                lowlevel,
                read_stream,
                write_stream,
                lifespan_state=state,
                init_options=lowlevel.create_initialization_options(),
            )


if __name__ == "__main__":
    if "--legacy" in sys.argv[1:]:
        anyio.run(serve_legacy)
    else:
        server.run("stdio")

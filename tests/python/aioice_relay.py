"""Two aioice agents (an independent ICE/TURN implementation, from PyPI) connect to
each other through the gateway's TURN relay only, then exchange messages.

Usage: aioice_relay.py HOST PORT USER_A PASS_A USER_B PASS_B MESSAGES [CA_FILE]
With CA_FILE the agents reach the relay over TLS (a `turns:` server, TURN over
TLS over TCP), trusting only that CA and checking the server's name (HOST);
without it over UDP.
Prints one JSON object; exits non-zero when anything did not arrive.
"""
import asyncio
import json
import ssl
import sys

import aioice


async def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    user_a, pass_a, user_b, pass_b = sys.argv[3:7]
    messages = int(sys.argv[7])
    tls = None
    if len(sys.argv) > 8:
        tls = ssl.create_default_context(cafile=sys.argv[8])

    def agent(controlling: bool, user: str, password: str) -> aioice.Connection:
        return aioice.Connection(
            ice_controlling=controlling,
            components=1,
            turn_server=(host, port),
            turn_username=user,
            turn_password=password,
            turn_transport="tcp" if tls else "udp",
            turn_ssl=tls if tls else False,
            transport_policy=aioice.TransportPolicy.RELAY,
        )

    a = agent(True, user_a, pass_a)
    b = agent(False, user_b, pass_b)
    result = {"relay_candidates": [], "received_by_a": 0, "received_by_b": 0}
    try:
        await asyncio.wait_for(asyncio.gather(a.gather_candidates(), b.gather_candidates()), 10)
        for conn in (a, b):
            result["relay_candidates"] += [
                f"{c.host}:{c.port}" for c in conn.local_candidates if c.type == "relay"
            ]
        for local, remote in ((a, b), (b, a)):
            for candidate in remote.local_candidates:
                await local.add_remote_candidate(candidate)
            await local.add_remote_candidate(None)
            local.remote_username = remote.local_username
            local.remote_password = remote.local_password
        await asyncio.wait_for(asyncio.gather(a.connect(), b.connect()), 15)
        for i in range(messages):
            await a.send(b"a->b %d" % i)
            data = await asyncio.wait_for(b.recv(), 5)
            if data == b"a->b %d" % i:
                result["received_by_b"] += 1
            await b.send(b"b->a %d" % i)
            data = await asyncio.wait_for(a.recv(), 5)
            if data == b"b->a %d" % i:
                result["received_by_a"] += 1
    except Exception as e:  # report, then fail
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        await a.close()
        await b.close()
    print(json.dumps(result))
    ok = (
        len(result["relay_candidates"]) == 2
        and result["received_by_a"] == messages
        and result["received_by_b"] == messages
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

"""Run the stand-in on its own (`python -m insertcoin.server.payments.standin`), e.g. for
tests that SIGKILL the server while Stripe must live on."""

import argparse
import asyncio

import uvicorn

from insertcoin.server.payments.standin import DEFAULT_RETRY_DELAYS, StandIn


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m insertcoin.server.payments.standin")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=12111)
    parser.add_argument("--webhook-url", help="where events are POSTed (none: no delivery)")
    parser.add_argument("--webhook-secret", required=True)
    parser.add_argument("--api-key", help="the only key accepted (default: any sk_test_ key)")
    parser.add_argument("--control", action="store_true", help="serve the /_control routes")
    parser.add_argument(
        "--retry-delays",
        type=lambda text: tuple(float(part) for part in text.split(",")),
        default=DEFAULT_RETRY_DELAYS,
        help="seconds between webhook attempts, comma-separated",
    )
    parser.add_argument("--async-delay", type=float, default=3.0)
    args = parser.parse_args()
    public_url = f"http://{args.host}:{args.port}"
    standin = StandIn(
        public_url=public_url,
        webhook_url=args.webhook_url,
        webhook_secret=args.webhook_secret,
        api_key=args.api_key,
        retry_delays=args.retry_delays,
        async_delay=args.async_delay,
        control=args.control,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            standin.app, host=args.host, port=args.port, log_level="warning", access_log=False
        )
    )
    standin.start()
    try:
        asyncio.run(_serve(server, public_url))
    finally:
        standin.stop()


async def _serve(server: uvicorn.Server, public_url: str) -> None:
    serving = asyncio.create_task(server.serve())
    while not server.started and not serving.done():
        await asyncio.sleep(0.01)
    if server.started:
        # Whoever started this process waits for this line before talking to it.
        print(f"stripe stand-in listening on {public_url}", flush=True)
    await serving


if __name__ == "__main__":
    main()

"""Container health check without curl: exit 0 when the service answers 200 on a path.

    python healthcheck.py            # GET /health: the process is alive (Docker's HEALTHCHECK)
    python healthcheck.py /ready     # GET /ready: the model is loaded and warmed (compose's depends_on)

It asks 127.0.0.1 on $STEPCREDIT_PORT (default 8000), the port the service binds inside the
container. Any other answer (503 while loading or draining), a refused connection or a
timeout exits 1 with the reason on stderr, which `docker inspect` shows.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def check(path: str, port: str, timeout_s: float = 4.0) -> tuple[bool, str]:
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200, f"{url}: {response.status}"
    except urllib.error.HTTPError as exc:  # 503 while loading or draining
        return False, f"{url}: {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{url}: {exc}"


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/health"
    healthy, why = check(path, os.environ.get("STEPCREDIT_PORT", "8000"))
    if not healthy:
        print(why, file=sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))

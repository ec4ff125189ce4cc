#!/usr/bin/env python3
"""Lints charts/pushcluster-operator with Helm's own library (helm-sdkpy,
installed by scripts/ensure-deps.sh). Prints Helm's messages; exits 1 when
Helm reports an error."""
import asyncio
import json
import sys

import helm_sdkpy


async def main(path):
    result = await helm_sdkpy.Lint(helm_sdkpy.Configuration()).run(path)
    print(json.dumps(result, indent=2))
    # Helm's severities: 1 info, 2 warning, 3 error.
    worst = max((m.get("Severity", 0) for m in result.get("Messages") or []), default=0)
    print(f"helm lint: {result.get('TotalChartsLinted')} chart(s), worst severity {worst}")
    return 1 if result.get("Errors") or worst >= 3 else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "charts/pushcluster-operator")))

"""Compare two outputs of eval/output_hashes.py; exits 1 if any output differs.

    python eval/compare_hashes.py before.json after.json
"""

import json
import sys


def main() -> None:
    a, b = (json.loads(open(p).read()) for p in sys.argv[1:3])
    diff = [k for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]
    for k in diff:
        print(f"DIFFERS {k}: {a[k]} != {b[k]}")
    only = sorted(a.keys() ^ b.keys())
    print(f"{len(a.keys() & b.keys())} outputs in both, {len(diff)} differ" + (f"; only in one: {only}" if only else ""))
    sys.exit(1 if diff or only else 0)


if __name__ == "__main__":
    main()

"""A Python plugin for Bulkhead: counts the words of every file in /in.

Built with componentize-py into a `wasi:cli/command` component:

    componentize-py -d wit -w command componentize wordcount -o python-wordcount.wasm

It writes /out/counts.json: per file its lines, words and bytes, the
totals, and the `--top=N` most frequent words (default 5; ties by word). A bad argument
or an unreadable input is a message on stderr and exit code 1.
"""

import json
import os
import re
import sys

from wit_world import exports

WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")


def top_param(argv):
    top = 5
    for arg in argv[1:]:
        if arg.startswith("--top="):
            top = int(arg[len("--top="):])
            if top < 0 or top > 1000:
                raise ValueError(f"--top={top}: expected 0 to 1000")
        else:
            raise ValueError(f"unknown argument {arg!r}")
    return top


def count(top):
    files = {}
    freq = {}
    for name in sorted(os.listdir("/in")):
        with open(os.path.join("/in", name), "rb") as f:
            data = f.read()
        text = data.decode("utf-8", errors="replace")
        words = [w.lower() for w in WORD.findall(text)]
        for w in words:
            freq[w] = freq.get(w, 0) + 1
        files[name] = {
            "lines": text.count("\n"),
            "words": len(words),
            "bytes": len(data),
        }
    ranked = sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return {
        "files": files,
        "total": {
            "words": sum(f["words"] for f in files.values()),
            "distinct": len(freq),
        },
        "top": [[w, n] for w, n in ranked],
    }


class Run(exports.Run):
    def run(self) -> None:
        try:
            result = count(top_param(sys.argv))
        except (OSError, ValueError) as e:
            print(f"python-wordcount: {e}", file=sys.stderr)
            sys.exit(1)
        with open("/out/counts.json", "w") as out:
            json.dump(result, out, indent=1, sort_keys=True)
            out.write("\n")
        print(
            f"python-wordcount: {len(result['files'])} files, "
            f"{result['total']['words']} words"
        )

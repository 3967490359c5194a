"""python -m mama_jax.viewer --model EXPORT_DIR [--port 8000] [--max-upload-mb 128]

A local web viewer of an exported model, on http://127.0.0.1:PORT/ only: drop DICOMs
(one, several, or a study folder), see each breast crop as the model sees it, the
class probabilities of every task with the head used, and the sentence-to-patch
similarity map of a typed sentence. Works with no network.
"""

from __future__ import annotations

import argparse
import signal
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mama_jax.viewer", description=__doc__.split("\n\n")[1])
    p.add_argument("--model", required=True, help="an export package folder (configs/export.py)")
    p.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (0 = any free one)")
    p.add_argument("--max-upload-mb", type=float, default=128, help="largest file accepted")
    args = p.parse_args(argv)

    import mama_jax
    from mama_jax.viewer.server import ViewerServer

    model = mama_jax.load(args.model)
    if model.decode is None:
        raise SystemExit(f"{args.model}: a format-1 package has no decode settings; export it again")
    server = ViewerServer(model, args.port, max_upload_mb=args.max_upload_mb)
    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # a kill also deletes the upload folder
    print(f"MaMA viewer: {server.url}  (model {model.path}; Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()  # deletes the upload folder
    return 0


if __name__ == "__main__":
    sys.exit(main())

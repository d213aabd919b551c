"""Infill or continue text with a trained model, from a template with masked spans.

examples:
  # fill two holes of 6 and 4 tokens (BPE pieces), 3 samples
  python tools/text.py --model runs/joint/bundle --template "ROMEO:\\nI [MASK:6] the [MASK:4] night." --num 3

  # continue a prompt by 40 tokens, write the samples to a file
  python tools/text.py --model runs/joint/bundle --prompt "First Citizen:\\n" --length 40 --output lines.txt

  # sharper samples: lower temperature, nucleus sampling, confidence-ordered unmasking
  python tools/text.py --model runs/joint/bundle --prompt "KING" --length 30 --temperature 0.8 --top-p 0.9 --method topk

[MASK] stands for --span tokens (default 8), [MASK:N] for N tokens. \\n and \\t
in the template or prompt are read as a newline and a tab. The text around the
holes is kept exactly. Samples are printed (or written to --output), each
after a '--- sample N ---' line. The same --seed gives the same text. Exit
status: 0 done, 2 a problem with the input (one line on stderr).
"""

from __future__ import annotations

import sys

from maskdiff import cli
from maskdiff.progress import progress_enabled


def build_parser():
    p = cli.parser(__doc__)
    cli.add_model(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--template", help="text with [MASK] / [MASK:N] holes")
    what.add_argument("--prompt", help="text to continue (with --length)")
    p.add_argument("--length", type=int, default=32, help="tokens to add after --prompt (default 32)")
    p.add_argument("--span", type=int, default=8, help="tokens of a bare [MASK] (default 8)")
    p.add_argument("--num", type=int, default=1, help="number of samples (default 1)")
    p.add_argument("--output", metavar="FILE", help="write the samples here instead of printing them")
    cli.add_sampling(p, steps=64, batch_size=32)
    cli.add_output(p)
    return p


def unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")


def run(args) -> int:
    from maskdiff.tasks.generation import fill
    from maskdiff.tasks.templates import text_template
    from maskdiff.core.tokens import Field, Record

    from maskdiff.adapters.text import SUPPORT

    if args.num < 1:
        raise cli.UserError(f"--num {args.num}: must be >= 1")
    if args.prompt is not None and args.length < 1:
        raise cli.UserError(f"--length {args.length}: must be >= 1")
    if args.output:
        cli.check_outputs([args.output], args.overwrite)
    bundle = cli.open_bundle(args.model, "text", args.device)
    adapter = bundle.adapters["text"]
    cli.check_count(args.num, adapter.max_len)
    template = unescape(args.template) if args.template is not None else unescape(args.prompt) + f"[MASK:{args.length}]"
    tokens = text_template(template, adapter.processor.encode, args.span, adapter.max_len)
    records = [Record([Field("text", SUPPORT, tokens.copy())], {"index": i}) for i in range(args.num)]
    cli.check_fill_memory(bundle, records, args.batch_size, args.device)
    filled = fill(bundle, records, cli.sampler_options(args), cli.generator(args.seed, args.device), batch_size=args.batch_size,
                  device=args.device, progress=progress_enabled(args.progress))
    text = "".join(f"--- sample {i} ---\n{adapter.decode(r)}\n" for i, r in enumerate(filled.records, 1))
    cli.emit(text, args.output, f"wrote {args.num} sample(s) to {args.output}, {filled.network_calls} network evaluations")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

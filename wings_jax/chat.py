"""Chat with a Wings checkpoint, streaming the reply::

    python -m wings_jax.chat --checkpoint DIR [--tokenizer DIR] [--image PATH ...] [--prompt TEXT]

With ``--prompt``: one answer, then exit. Without: an interactive multi-turn conversation (an empty
line or end of input quits). The images belong to the first turn, one ``<image>`` mark each.
"""

from __future__ import annotations

import argparse
import logging
import sys

import jax

from wings_jax.api import Assistant
from wings_jax.batch import SampleTooLong
from wings_jax.conversation import IMAGE_MARK
from wings_jax.generate import Sampling


def _stream(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def chat(assistant: Assistant, images, sampling: Sampling, seed: int, prompt: str | None,
         read=input, write=_stream) -> list[dict]:
    """One reply to ``prompt``, or turns read with ``read`` until an empty line (or until the conversation
    outgrows the model); returns the conversation."""
    turns: list[dict] = []
    rng = jax.random.PRNGKey(seed)
    while True:
        if prompt is None:
            try:
                text = read("user> ").strip()
            except EOFError:
                write("\n")  # end the prompt's line
                break
            if not text:
                break
        else:
            text = prompt
        if not turns and images:
            text = IMAGE_MARK * len(images) + "\n" + text
        turns.append({"from": "human", "value": text})
        rng, key = jax.random.split(rng)
        write("assistant> ")
        try:
            reply = assistant.answer(turns, images, sampling, rng=key, stream=write)
        except SampleTooLong as error:
            write(f"[the conversation no longer fits: {error}]\n")
            turns.pop()
            break
        write("\n")
        turns.append({"from": "gpt", "value": reply})
        if prompt is not None:
            break
    return turns


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m wings_jax.chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a wings_jax.checkpoint directory")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint)")
    parser.add_argument("--template", default="qwen", help="chat template: qwen or llama3")
    parser.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    parser.add_argument("--prompt", help="answer this and exit (default: interactive)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    assistant = Assistant.load(args.checkpoint, args.tokenizer, template=args.template)
    images = [assistant.pixels(path) for path in args.image]
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p)
    return chat(assistant, images, sampling, args.seed, args.prompt)


if __name__ == "__main__":
    main()

"""The chat front end on a tiny saved checkpoint: ``chat()`` in process, and ``python -m wings_jax.chat``
run as a user would (one answer with --prompt; two turns then end of input on stdin), whose streamed
output must be exactly what the in-process conversation writes."""

import os
import subprocess
import sys
from pathlib import Path

from tiny_checkpoint import IMAGE

from wings_jax import chat as chat_cli
from wings_jax.generate import Sampling

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_NEW_TOKENS = 4


def _transcript(assistant, images, prompt, lines=()):
    """What ``chat`` writes (input prompts included, as ``input()`` prints them), and the turns it returns."""
    out = []
    remaining = iter(lines)

    def read(text):
        out.append(text)
        line = next(remaining, None)
        if line is None:
            raise EOFError
        return line

    turns = chat_cli.chat(assistant, images, Sampling(max_new_tokens=MAX_NEW_TOKENS), 0, prompt, read=read,
                          write=out.append)
    return "".join(out), turns


def _run_cli(*args, stdin=""):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    done = subprocess.run([sys.executable, "-m", "wings_jax.chat", *args, "--max-new-tokens", str(MAX_NEW_TOKENS)],
                          input=stdin, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_one_prompt_puts_the_image_mark_on_the_first_turn(assistant, checkpoint):
    images = [assistant.pixels(str(checkpoint / IMAGE))]
    text, turns = _transcript(assistant, images, "Hi")
    assert [t["from"] for t in turns] == ["human", "gpt"] and turns[0]["value"] == "<image>\nHi"
    assert text.startswith("assistant> ") and text.endswith("\n")
    assert text[len("assistant> "):-1].strip() == turns[1]["value"]


def test_interactive_turns_until_an_empty_line(assistant):
    text, turns = _transcript(assistant, [], None, ["first", "second", "", "never read"])
    assert [t["value"] for t in turns[::2]] == ["first", "second"]
    assert [t["from"] for t in turns] == ["human", "gpt", "human", "gpt"]
    assert text.count("user> ") == 3 and text.count("assistant> ") == 2


def test_a_conversation_too_long_for_the_model_ends_with_a_message(assistant):
    text, turns = _transcript(assistant, [], None, ["hello", "red " * assistant.max_length])
    assert [t["value"] for t in turns[::2]] == ["hello"] and len(turns) == 2
    assert text.endswith(f"exceed the model's {assistant.max_length}]\n")


def test_cli_prompt_streams_the_answer(assistant, checkpoint):
    images = [assistant.pixels(str(checkpoint / IMAGE))]
    expected, turns = _transcript(assistant, images, "What colour?")
    assert turns[1]["value"], "the tiny model's greedy answer should not be empty (else this test checks little)"
    stdout = _run_cli("--checkpoint", str(checkpoint), "--image", str(checkpoint / IMAGE), "--prompt", "What colour?")
    assert stdout == expected


def test_cli_interactive_reads_turns_from_stdin_until_eof(assistant, checkpoint):
    expected, turns = _transcript(assistant, [], None, ["What colour?", "And the shape?"])
    assert expected.endswith("user> \n") and len(turns) == 4
    stdout = _run_cli("--checkpoint", str(checkpoint), "--tokenizer", str(checkpoint),
                      stdin="What colour?\nAnd the shape?\n")
    assert stdout == expected

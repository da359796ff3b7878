"""What a command imports before it needs a model."""
import subprocess
import sys

# open_clip's package imports all the others; torchvision imports torch._dynamo (seconds in all)
HEAVY = ("open_clip", "transformers", "timm", "torchvision", "torch._dynamo")


def test_segment_imports_no_model_library_before_loading_a_model(tmp_path):
    # A pattern matching no image stops `segment` after its vocabulary, output folder and inputs, before the model.
    script = ("import sys; from ovdense.cli import main; "
              "code = main(['segment', 'none/*.png', '--classes', 'sky, grass; lawn', '--output', 'out']); "
              f"print(code, [m for m in {HEAVY!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.stdout.strip() == "1 []", done.stderr
    assert "none/*.png: no image found there" in done.stderr

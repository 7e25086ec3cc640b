"""cpoc_kernels.progress: the (done, total) callback over tqdm used by the CLI and the mixed demo."""
import io

from cpoc_kernels.progress import ProgressBar


def test_progress_bar_redraws_sparingly_and_always_finishes():
    stream = io.StringIO()
    bar = ProgressBar(1000, stream=stream)
    for done in range(1, 1001):
        bar(done)
    text = stream.getvalue()
    assert text.count("\r") < 50  # a burst of updates does not flood the terminal
    last = text.rstrip("\n").rsplit("\r", 1)[1]
    assert "1000/1000" in last and "100%" in last and "nonces/s" in last and text.endswith("\n")
    assert bar.closed
    bar(1000)  # a call after the end draws nothing more
    assert stream.getvalue() == text


def test_progress_bar_follows_a_changing_total_and_batch_jumps():
    stream = io.StringIO()
    bar = ProgressBar(10, "chat requests", stream=stream)
    bar(4)
    assert not bar.closed
    bar(8, 20)  # the caller learned a larger total
    assert not bar.closed
    bar(20, 20)
    assert bar.closed and "20/20" in stream.getvalue() and "chat requests" in stream.getvalue()

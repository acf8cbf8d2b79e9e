import subprocess
import sys


def test_demo_prints_table():
    out = subprocess.run([sys.executable, "-m", "turboquant", "demo", "--tokens", "512"],
                         capture_output=True, text=True, check=True).stdout
    lines = [ln for ln in out.splitlines() if ln.startswith("turboquant_mse")]
    assert len(lines) == 4
    # bits 3: 50 bytes, 5.12x
    assert any(" 3 " in ln and "50" in ln and "5.12x" in ln for ln in lines)


def test_cli_without_command_shows_help():
    r = subprocess.run([sys.executable, "-m", "turboquant"], capture_output=True, text=True)
    assert r.returncode == 2 and "demo" in r.stdout

"""benchmarks.sweep_vs_original's phase table: read from the log lines both sides write."""
from benchmarks.sweep_vs_original import median_phases, phases, print_phases

OURS = ("I1204 23:51:08.1 1 engine.py:365] sweep SmolLM2-135M-Instruct: 33 XLA programs (0 compiled, 33 read from "
        "the persistent compilation cache) in 0.4s; time in shared prefix 8.8s, prefill 23.4s, decode 22.1s for 289 "
        "steps (1345 row-steps); compiles included\n")
HF = ("I1204 23:50:06.8 1 hf_baseline.py:197] baseline (sdpa prefill, eager decode): 27 tests in 122.5s (start-up "
      "and planning 2.8s; prefill 50.4s, decode 68.5s, copy test 0.7s; 2 torch threads)\n")


def test_phases_of_ours_and_the_baseline():
    ours = phases("tqdm noise\n" + OURS, 57.3)
    assert ours["prefill"] == 8.8 + 23.4 and ours["decode"] == 22.1
    assert (ours["steps"], ours["row_steps"]) == (289, 1345)
    assert abs(ours["rest"] - (57.3 - 8.8 - 23.4 - 22.1)) < 1e-9
    hf = phases(HF, 125.7)
    assert (hf["prefill"], hf["decode"], hf["steps"]) == (50.4, 68.5, None)
    assert abs(hf["rest"] - (125.7 - 50.4 - 68.5)) < 1e-9
    assert phases("a log without the line", 10.0) is None


def test_phase_table_ratios_and_medians(capsys):
    runs = [phases(OURS, 57.3), phases(OURS.replace("decode 22.1s", "decode 20.1s"), 55.3),
            phases(OURS.replace("decode 22.1s", "decode 30.1s"), 70.0)]
    med = median_phases(runs)
    assert med["decode"] == 22.1 and med["steps"] == 289
    assert median_phases([runs[0], None]) is None
    print_phases(["baseline", "cold", "warm"], {"baseline": phases(HF, 125.7), "cold": None, "warm": med})
    out = capsys.readouterr().out
    assert "cold" not in out.split("\n")[2]       # a run without phases gets no column
    decode = next(line for line in out.splitlines() if line.strip().startswith("decode "))
    assert "68.5 s" in decode and "22.1 s" in decode and f"{68.5 / 22.1:4.1f}x" in decode
    assert "289 steps for 1345 row-steps (76 ms a step)" in out

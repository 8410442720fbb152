"""Independent check of the relay's WFDB export with the Python `wfdb` package (PhysioNet).

Usage: check_export.py ORIGINAL EXPORT [--same-checksums] ...  (record paths without extension)

Reads both records with smooth_frames=False (every signal at its own rate) and checks, signal by
signal (matched by name), that the export holds every sample of the original, bit for bit, at the
same samples per frame, frame rate, counter frequency, gain, baseline and units; that each
checksum in the export's header is the checksum of its samples; and with --same-checksums that
the export's checksums equal the original header's (not so for a skewed original: the samples
padded past the end of its file change the sum). Prints one line per record; exits 1 on the first
difference.
"""

import sys

import numpy as np
import wfdb


def fail(msg):
    print(f"FAIL {msg}", file=sys.stderr)
    sys.exit(1)


def check(original, export, same_checksums):
    o = wfdb.rdrecord(original, physical=False, smooth_frames=False)
    e = wfdb.rdrecord(export, physical=False, smooth_frames=False)
    if e.fs != o.fs:
        fail(f"{export}: frame rate {e.fs} != {o.fs}")
    if (e.counter_freq or None) != (o.counter_freq or None):
        fail(f"{export}: counter frequency {e.counter_freq} != {o.counter_freq}")
    if e.sig_len != o.sig_len:
        fail(f"{export}: {e.sig_len} frames != {o.sig_len}")
    if sorted(e.sig_name) != sorted(o.sig_name):
        fail(f"{export}: signals {e.sig_name} != {o.sig_name}")
    computed = e.calc_checksum(expanded=True)
    samples = 0
    for i, name in enumerate(o.sig_name):
        j = e.sig_name.index(name)
        for field in ("samps_per_frame", "adc_gain", "baseline", "units"):
            a, b = getattr(o, field)[i], getattr(e, field)[j]
            if a != b:
                fail(f"{export} {name}: {field} {b!r} != {a!r}")
        a, b = o.e_d_signal[i], e.e_d_signal[j]
        if len(a) != len(b):
            fail(f"{export} {name}: {len(b)} samples != {len(a)}")
        if not np.array_equal(a.astype(np.int64), b.astype(np.int64)):
            k = int(np.argmax(a.astype(np.int64) != b.astype(np.int64)))
            fail(f"{export} {name}: sample {k} is {b[k]}, original {a[k]}")
        if e.checksum[j] % 65536 != computed[j] % 65536:
            fail(f"{export} {name}: header checksum {e.checksum[j]} != samples' {computed[j]}")
        if same_checksums and e.checksum[j] % 65536 != o.checksum[i] % 65536:
            fail(f"{export} {name}: checksum {e.checksum[j]} != original {o.checksum[i]}")
        samples += len(a)
    print(f"OK {export}: {len(o.sig_name)} signals, {samples} samples, "
          f"samples per frame {e.samps_per_frame}")


def main(args):
    if not args:
        fail("no records")
    while args:
        original, export, args = args[0], args[1], args[2:]
        same = bool(args) and args[0] == "--same-checksums"
        if same:
            args = args[1:]
        check(original, export, same)


if __name__ == "__main__":
    main(sys.argv[1:])

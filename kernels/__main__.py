"""python -m kernels: which implementation each fused op uses on this machine, and why."""

from kernels.dispatch import report

if __name__ == "__main__":
    print(report())

"""The ``gp2p`` command (placeholder until the CLI step)."""
def main(argv=None):
    return 0

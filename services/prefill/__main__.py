import sys

from services.cli import main

main(["prefill", *sys.argv[1:]])

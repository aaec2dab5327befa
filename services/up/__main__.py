import sys

from services.cli import main

main(["up", *sys.argv[1:]])

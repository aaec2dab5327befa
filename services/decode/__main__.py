import sys

from services.cli import main

main(["decode", *sys.argv[1:]])

import sys

from services.cli import main

main(["gateway", *sys.argv[1:]])

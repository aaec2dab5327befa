import sys

from services.cli import main

main(["registry", *sys.argv[1:]])

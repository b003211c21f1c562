# What nix/package.nix installs, for tests/module_layout.py: its file set and its
# install phase, evaluated with stand-ins for nixpkgs (no nixpkgs here).
# The test then runs that install phase, so the file list is read, never retyped.
#
# usage: nix-instantiate --eval --strict --json tests/nix/package-layout.nix \
#          --argstr python /usr/bin/python3 --argstr nixBin /usr/bin
{ python, nixBin }:
let
  stub = outPath: { type = "derivation"; inherit outPath; binDir = "${outPath}/bin"; };
  lib = {
    fileset.toSource = { root, fileset }: { inherit root fileset; };
    fileset.unions = paths: paths;
    makeBinPath = packages: builtins.concatStringsSep ":" (map (package: package.binDir) packages);
    platforms.linux = [ ];
  };
  # The machine's own Nix and Python stand in for the packages.
  nixPackage = stub "/nonexistent/nix" // { binDir = nixBin; };
  pythonPackage = stub "/nonexistent/python" // { interpreter = python; binDir = dirOf python; };
  package = import ../../nix/package.nix {
    inherit lib;
    stdenvNoCC.mkDerivation = attrs: attrs;
    makeWrapper = stub "/nonexistent/make-wrapper";
    bash = stub "/nonexistent/bash";
    python3.withPackages = _: pythonPackage;
    nix = nixPackage;
  };
in
{
  root = toString package.src.root;
  files = map toString package.src.fileset;
  inherit (package) installPhase;
}

{
  description = "nix-hash-collection: collect and compare the output hashes of Nix builds from several builders";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = function: nixpkgs.lib.genAttrs systems
        (system: function nixpkgs.legacyPackages.${system});

      # What checks.pytest runs: the tests that need neither a Nix store, nor a browser,
      # nor the network, none of which the build sandbox has. test_browser.py imports
      # playwright, which the sandbox's Python lacks, at collection time.
      # tests/test_sandbox_selection.py runs exactly this line with all three hidden.
      pytestInSandbox = ''python -m pytest -p no:cacheprovider -m "not nix and not browser" --ignore=tests/test_browser.py tests'';

      testPythonFor = pkgs: pkgs.python3.withPackages (ps: [
        ps.flask
        ps.waitress
        ps.requests
        ps.pynacl
        ps.google-re2
        ps.msgspec
        ps.pytest
        ps.hypothesis
      ]);
    in
    {
      overlays.default = final: _prev: {
        nix-hash-collection = final.callPackage ./nix/package.nix { };
      };

      nixosModules.hash-collection = ./module.nix;
      nixosModules.default = self.nixosModules.hash-collection;

      packages = forAllSystems (pkgs: rec {
        default = pkgs.callPackage ./nix/package.nix { };

        # Builder-side tools: `nix shell .#utils`, then `./fetch-from-cache.sh` or
        # `./rebuilder.sh` from a checkout, or the same commands from PATH.
        utils = pkgs.buildEnv {
          name = "nix-hash-collection-utils";
          paths = [
            default.python
            pkgs.nix
            (pkgs.runCommand "nix-hash-collection-builder-commands" { } ''
              mkdir -p $out/bin
              for command in fetch-from-cache.sh rebuilder.sh hash-collection-client hash-collection-hook; do
                ln -s ${default}/bin/$command $out/bin/$command
              done
            '')
          ];
          pathsToLink = [ "/bin" ];
        };
      });

      apps = forAllSystems (pkgs:
        let package = self.packages.${pkgs.stdenv.hostPlatform.system}.default; in
        rec {
          server = { type = "app"; program = "${package}/bin/hash-collection-server"; };
          create_user = { type = "app"; program = "${package}/bin/create_user"; };
          default = server;
        });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = [
            (testPythonFor pkgs)
            pkgs.nix
            pkgs.shellcheck
            pkgs.curl
          ];
        };
      });

      checks = forAllSystems (pkgs: {
        pytest = pkgs.runCommand "nix-hash-collection-pytest"
          { nativeBuildInputs = [ (testPythonFor pkgs) ]; }
          ''
            cp -r ${self} source
            chmod -R u+w source
            cd source
            patchShebangs .
            export HOME=$TMPDIR
            ${pytestInSandbox}
            touch $out
          '';

        vm = import ./tests/vm.nix {
          inherit pkgs;
          module = self.nixosModules.default;
        };
      });
    };
}

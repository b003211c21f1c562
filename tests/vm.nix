# NixOS VM test: a server machine and a builder machine using module.nix.
# A user on the builder builds a derivation through the Nix daemon; its attestation,
# signed, shows up on the server; a `--check` rebuild that differs is reported by the
# diff hook, as a build user. Needs nixpkgs and KVM: run it with `nix flake check` or
# `nix build .#checks.x86_64-linux.vm`. CI here has no nixpkgs and does not run it;
# tests/test_nixos_module.py evaluates its nodes' services with the module's
# structural check, and tests/test_daemon_mode.py runs the same flow with Debian's nix-daemon.
{ pkgs, module ? ../module.nix }:
let
  port = 8000;
  # Test-only secrets; real ones never belong in the store.
  token = "948fff91b54fcbd9e6fcf2c7116a4356";
  secretKey = "vm-builder-1:LyydYUhowseaYrV7kyNCe6qvePH4GP6zObMh1iA0TqU/sFKRVIG6RMzhcl+1s1GFRXkfw61+D016WOSq4jAz9g==";
  publicKey = "vm-builder-1:P7BSkVSBukTM4XJftbNRhUV5H8Otfg9NeljkquIwM/Y=";

  derivationFile = pkgs.writeText "vm-test-derivation.nix" ''
    derivation {
      name = "vm-test-output";
      system = builtins.currentSystem;
      builder = "/bin/sh";
      args = [ "-c" "echo reproducible > $out" ];
    }
  '';
  # Differs on every build, so `--check` runs the diff hook.
  unstableDerivationFile = pkgs.writeText "vm-test-unstable.nix" ''
    derivation {
      name = "vm-test-unstable";
      system = builtins.currentSystem;
      builder = "/bin/sh";
      args = [ "-c" "read x < /proc/sys/kernel/random/uuid; echo $x > $out" ];
    }
  '';
in
pkgs.testers.runNixOSTest {
  name = "nix-hash-collection";

  nodes.server = { ... }: {
    imports = [ module ];
    services.hash-collection-server = {
      enable = true;
      host = "0.0.0.0";
      inherit port;
      openFirewall = true;
      requireSignatures = true;
    };
  };

  nodes.builder = { lib, ... }: {
    imports = [ module ];
    services.hash-collection = {
      enable = true;
      collection-url = "http://server:${toString port}";
      tokenFile = "/etc/hash-collection/token";
      secretKeyFile = "/etc/hash-collection/secret-key";
    };
    # The secrets exist (activation) before hash-collection-secrets.service copies them for the diff hook.
    system.activationScripts.provision-test-secrets = ''
      install -d -m 0700 /etc/hash-collection
      install -m 0600 ${pkgs.writeText "token" token} /etc/hash-collection/token
      install -m 0600 ${pkgs.writeText "secret-key" secretKey} /etc/hash-collection/secret-key
    '';
    users.users.alice = { isNormalUser = true; };
    nix.settings.substituters = lib.mkForce [ ];
    environment.systemPackages = [ pkgs.curl ];
  };

  testScript = ''
    import json

    server.wait_for_unit("hash-collection-server.service")
    server.wait_for_open_port(${toString port})
    server.succeed("create_user vm-builder ${token} --public-key ${publicKey}")

    builder.wait_for_unit("multi-user.target")
    builder.wait_for_unit("hash-collection-secrets.service")
    builder.succeed("systemctl list-timers hash-collection-flush.timer | grep hash-collection-flush")
    builder.succeed("test \"$(stat -c %U:%G:%a /run/hash-collection/secret-key)\" = root:nixbld:640")
    builder.succeed("test \"$(stat -c %U:%G:%a /var/lib/hash-collection/spool)\" = root:root:700")
    builder.succeed("test \"$(stat -c %U:%G:%a /var/lib/hash-collection/build-user-spool)\" = root:nixbld:2770")
    builder.wait_until_succeeds("curl -sf http://server:${toString port}/healthz")

    def as_alice(command):
        return builder.succeed(f"su - alice -c '{command}'").strip()

    def attestations_of(drv_path):
        drv_ident = drv_path.removeprefix("/nix/store/").removesuffix(".drv")
        return json.loads(builder.succeed(
            f"curl -sf 'http://server:${toString port}/derivations/{drv_ident}?full=true'"))

    # A user's build goes through nix-daemon, which runs the post-build hook as root.
    drv_path = as_alice("nix-instantiate ${derivationFile}")
    out_path = as_alice(f"nix-build --no-out-link {drv_path}")
    builder.wait_until_succeeds(
        f"curl -sf 'http://server:${toString port}/derivations/{drv_path.removeprefix('/nix/store/').removesuffix('.drv')}' "
        f"| grep -F {out_path}", timeout=60)
    attestations = attestations_of(drv_path)
    assert [a["builder"] for a in attestations] == ["vm-builder"], attestations
    assert attestations[0]["verified"], attestations

    # A rebuild that differs: the diff hook, as a build user, reports the second hash.
    unstable = as_alice("nix-instantiate ${unstableDerivationFile}")
    as_alice(f"nix-build --no-out-link {unstable}")
    builder.fail(f"su - alice -c 'nix-build --no-out-link --check {unstable}'")
    builder.wait_until_succeeds(
        f"test \"$(curl -sf 'http://server:${toString port}/derivations/{unstable.removeprefix('/nix/store/').removesuffix('.drv')}?full=true' "
        "| grep -o output_hash | wc -l)\" = 2", timeout=60)
    assert all(a["verified"] for a in attestations_of(unstable)), attestations_of(unstable)
    assert len({a["output_hash"] for a in attestations_of(unstable)}) == 2
    builder.succeed("test -z \"$(ls -A /var/lib/hash-collection/spool)\"")
  '';
}

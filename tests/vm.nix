# NixOS VM test: a server machine and a builder machine using module.nix.
# The builder builds a derivation; its attestation, signed, shows up on the server.
# Needs nixpkgs and KVM: run it with `nix flake check` or `nix build .#checks.x86_64-linux.vm`.
# CI here has no nixpkgs and does not run it; tests/test_nixos_module.py only parses it.
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
    # The secrets exist before the module copies them for the diff hook.
    system.activationScripts.provision-test-secrets = ''
      install -d -m 0700 /etc/hash-collection
      install -m 0600 ${pkgs.writeText "token" token} /etc/hash-collection/token
      install -m 0600 ${pkgs.writeText "secret-key" secretKey} /etc/hash-collection/secret-key
    '';
    system.activationScripts.hash-collection-secrets.deps = [ "provision-test-secrets" ];
    nix.settings.substituters = lib.mkForce [ ];
    environment.systemPackages = [ pkgs.curl ];
  };

  testScript = ''
    import json

    server.wait_for_unit("hash-collection-server.service")
    server.wait_for_open_port(${toString port})
    server.succeed("create_user vm-builder ${token} --public-key ${publicKey}")

    builder.wait_for_unit("multi-user.target")
    builder.succeed("systemctl list-timers hash-collection-flush.timer | grep hash-collection-flush")
    builder.succeed("test \"$(stat -c %G:%a /run/hash-collection/secret-key)\" = nixbld:640")
    builder.wait_until_succeeds("curl -sf http://server:${toString port}/healthz")

    drv_path = builder.succeed("nix-instantiate ${derivationFile}").strip()
    out_path = builder.succeed(f"nix-build --no-out-link {drv_path}").strip()
    drv_ident = drv_path.removeprefix("/nix/store/").removesuffix(".drv")

    builder.wait_until_succeeds(
        f"curl -sf http://server:${toString port}/derivations/{drv_ident} | grep -F {out_path}", timeout=60)
    attestations = json.loads(builder.succeed(
        f"curl -sf 'http://server:${toString port}/derivations/{drv_ident}?full=true'"))
    assert [a["builder"] for a in attestations] == ["vm-builder"], attestations
    assert attestations[0]["verified"], attestations
  '';
}

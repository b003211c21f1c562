# The smallest stand-in for nixpkgs' `lib` that module.nix needs, for the
# structural check in tests/test_nixos_module.py. It is NOT nixpkgs' lib:
# mkIf and mkMerge only build markers that module-harness.nix resolves, and
# each type only knows how to check a value.
let
  inherit (builtins) isBool isInt isString replaceStrings substring stringLength concatStringsSep;

  hasPrefix = prefix: text: substring 0 (stringLength prefix) text == prefix;
in
rec {
  inherit hasPrefix;

  removePrefix = prefix: text:
    if hasPrefix prefix text
    then substring (stringLength prefix) (stringLength text - stringLength prefix) text
    else text;

  mkOption = attrs: attrs // { _type = "option"; };
  mkEnableOption = name: mkOption {
    type = types.bool;
    default = false;
    description = "Whether to enable ${name}.";
  };
  mkIf = condition: content: { _type = "if"; inherit condition content; };
  mkMerge = contents: { _type = "merge"; inherit contents; };
  literalExpression = text: { _type = "literalExpression"; inherit text; };

  hiPrio = package: package // { meta = (package.meta or { }) // { priority = -10; }; };

  optional = condition: value: if condition then [ value ] else [ ];
  optionalString = condition: text: if condition then text else "";

  escapeShellArg = arg: "'" + replaceStrings [ "'" ] [ "'\\''" ] (toString arg) + "'";
  escapeShellArgs = args: concatStringsSep " " (map escapeShellArg args);

  types = {
    bool = { name = "bool"; check = isBool; };
    # Like nixpkgs: a path literal is not a string, so it is rejected.
    str = { name = "str"; check = isString; };
    port = { name = "16 bit unsigned integer"; check = v: isInt v && v >= 0 && v <= 65535; };
    ints.positive = { name = "positive integer"; check = v: isInt v && v > 0; };
    package = { name = "package"; check = v: builtins.isAttrs v && v ? outPath; };
    nullOr = type: { name = "null or ${type.name}"; check = v: v == null || type.check v; };
  };
}

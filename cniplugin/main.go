// Command ztunnel-redirect-cni is the CNI plugin of ztunnel-redirect.
//
// The container runtime runs it on the host, chained after the primary CNI plugin, at pod sandbox
// creation. It holds no policy of its own: ADD hands the pod to the node agent over the agent's
// Unix socket and prints the primary plugin's result back unchanged; every decision is the
// agent's. Only when the agent does not answer does it decide by itself, from the decision file
// that the agent keeps in its run directory (decisions.go). It holds no credentials.
//
// Commands (the CNI specification, versions 0.3.0 to 1.1.0):
//
//   - ADD: see cmdAdd.
//   - DEL: always succeeds without output (a failed DEL blocks the pod's teardown; the agent
//     cleans up from pod events).
//   - CHECK, GC, STATUS: succeed without output, from the CNI version that defines them on.
//   - VERSION: prints the supported versions.
//
// Errors are the CNI error object on stdout with exit status 1. Log lines go to stderr (the
// runtime's log) and, once the command is done, to the agent's log socket (log.go).
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
)

// latestVersion answers VERSION without a usable config, and is the version of an error object
// when the request has none.
const latestVersion = "1.1.0"

// supportedVersions: 0.3.0 and 0.3.1 results have the same shape; prevResult is printed back
// unchanged anyway.
var supportedVersions = []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}

// firstVersionOf holds the commands that older CNI versions do not define. containernetworking/cni's
// skel (which every reference plugin runs on) answers them with error 1, "config version does not
// allow CHECK", and libcni never sends them below these versions; so do we.
var firstVersionOf = map[string]string{"CHECK": "0.4.0", "GC": "1.1.0"}

// CNI error codes (the CNI specification, "Error"); 100 and above are the plugin's own.
const (
	codeIncompatibleVersion = 1
	codeInvalidEnvironment  = 4
	codeIOFailure           = 5
	codeInvalidConfig       = 7
	codeTryAgainLater       = 11
	codePlugin              = 999
)

// pluginError becomes the CNI error object that the runtime reads from stdout.
type pluginError struct {
	code    int
	msg     string
	details string
}

func (e *pluginError) Error() string { return e.msg }

func main() {
	log := newLogger(os.Stderr)
	code, out := run(environ(os.Environ()), os.Stdin, log)
	if out != "" {
		// Nothing to do about a failed write: the runtime reads the exit status too.
		_, _ = os.Stdout.WriteString(out + "\n")
	}
	log.flush()
	os.Exit(code)
}

func environ(pairs []string) map[string]string {
	env := make(map[string]string, len(pairs))
	for _, pair := range pairs {
		if key, value, ok := strings.Cut(pair, "="); ok {
			env[key] = value
		}
	}
	return env
}

// run runs one command; it returns the exit status and what to print on stdout.
func run(env map[string]string, stdin io.Reader, log *logger) (status int, out string) {
	command := env["CNI_COMMAND"]
	version := latestVersion
	args := parseCNIArgs(env["CNI_ARGS"])
	log.pod = podRef{namespace: args["K8S_POD_NAMESPACE"], name: args["K8S_POD_NAME"]}
	defer func() {
		// A bug must still give the runtime an error object, never a Go stack trace alone.
		if r := recover(); r != nil {
			log.errorf("internal error: %v\n%s", r, debug.Stack())
			if command == "DEL" {
				status, out = 0, ""
				return
			}
			msg := fmt.Sprintf("internal error: %v", r)
			status, out = 1, errorObject(version, &pluginError{codePlugin, msg, ""})
		}
	}()
	data, readErr := readStdin(stdin)
	switch command {
	case "VERSION":
		return 0, versionOutput(requestedVersionForVersion(data, readErr))
	case "DEL":
		cmdDel(data, readErr, log)
		return 0, ""
	}
	raw, err := loadConf(data, readErr)
	if err == nil {
		version = requestedVersion(raw)
		if out, err = dispatch(command, raw, env, log); err == nil {
			return 0, out
		}
	}
	name := command
	if name == "" {
		name = "command"
	}
	log.errorf("%s failed: %s", name, err.msg)
	return 1, errorObject(version, err)
}

func dispatch(command string, raw map[string]json.RawMessage, env map[string]string, log *logger) (string, *pluginError) {
	conf, err := parseNetConf(raw)
	if err != nil {
		return "", err
	}
	log.useConf(conf)
	if !isSupported(conf.cniVersion) {
		return "", &pluginError{
			codeIncompatibleVersion,
			fmt.Sprintf("incompatible CNI version %q", conf.cniVersion),
			"supported: " + strings.Join(supportedVersions, ", "),
		}
	}
	if first, ok := firstVersionOf[command]; ok && compareVersions(conf.cniVersion, first) < 0 {
		return "", &pluginError{
			codeIncompatibleVersion,
			fmt.Sprintf("config version %s does not allow %s (from %s on)", conf.cniVersion, command, first),
			"",
		}
	}
	switch command {
	case "ADD":
		return cmdAdd(conf, env, log)
	case "CHECK", "GC", "STATUS":
		return "", nil
	case "":
		return "", &pluginError{codeInvalidEnvironment, "missing environment variable CNI_COMMAND", ""}
	}
	return "", &pluginError{codeInvalidEnvironment, fmt.Sprintf("unknown CNI_COMMAND %q", command), ""}
}

// cmdDel has nothing to do (the agent cleans up from pod events) and never fails: a failed DEL
// blocks the pod's teardown, so a config we cannot read is only logged.
func cmdDel(data []byte, readErr *pluginError, log *logger) {
	raw, err := loadConf(data, readErr)
	var conf *netConf
	if err == nil {
		conf, err = parseNetConf(raw)
	}
	if err != nil {
		log.warnf("DEL with an unusable network config (%s): nothing to do", err.msg)
		return
	}
	log.useConf(conf)
	if !isSupported(conf.cniVersion) {
		log.warnf("DEL with unsupported CNI version %q: nothing to do", conf.cniVersion)
	}
}

func versionOutput(version string) string {
	return mustMarshal(struct {
		CNIVersion        string   `json:"cniVersion"`
		SupportedVersions []string `json:"supportedVersions"`
	}{version, supportedVersions})
}

// requestedVersionForVersion is the version VERSION answers in: the config's when it is a
// supported one, else the latest.
func requestedVersionForVersion(data []byte, readErr *pluginError) string {
	raw, err := loadConf(data, readErr)
	if err != nil {
		return latestVersion
	}
	conf, err := parseNetConf(raw)
	if err != nil || !isSupported(conf.cniVersion) {
		return latestVersion
	}
	return conf.cniVersion
}

// requestedVersion is the cniVersion of the request, for the error object (the CNI specification:
// the error's cniVersion is the request's, supported or not); the latest when the request has none.
func requestedVersion(raw map[string]json.RawMessage) string {
	if version, ok := jsonString(raw["cniVersion"]); ok && version != "" {
		return version
	}
	return latestVersion
}

func errorObject(version string, err *pluginError) string {
	return mustMarshal(struct {
		CNIVersion string `json:"cniVersion"`
		Code       int    `json:"code"`
		Msg        string `json:"msg"`
		Details    string `json:"details"`
	}{version, err.code, err.msg, err.details})
}

func isSupported(version string) bool {
	for _, v := range supportedVersions {
		if v == version {
			return true
		}
	}
	return false
}

// compareVersions orders two dotted versions numerically ("0.4.0" < "1.0.0"); a part that is not
// a number counts as 0 (only supported versions reach it).
func compareVersions(a, b string) int {
	as, bs := strings.Split(a, "."), strings.Split(b, ".")
	for i := 0; i < len(as) || i < len(bs); i++ {
		var x, y int
		if i < len(as) {
			x, _ = strconv.Atoi(as[i])
		}
		if i < len(bs) {
			y, _ = strconv.Atoi(bs[i])
		}
		if x != y {
			if x < y {
				return -1
			}
			return 1
		}
	}
	return 0
}

func mustMarshal(v any) string {
	data, err := json.Marshal(v)
	if err != nil {
		panic(err) // only called with plain structs of strings and ints
	}
	return string(data)
}

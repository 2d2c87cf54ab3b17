package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"path/filepath"
	"strings"
	"testing"
)

const testNetns = "/var/run/netns/cni-6f1e2d3c-aaaa-bbbb-cccc-0123456789ab"

// prevResultOf is what a primary plugin hands on, in the shape of each version.
func prevResultOf(version string) map[string]any {
	v4 := map[string]any{"address": "10.244.1.7/24", "gateway": "10.244.1.1", "interface": 0}
	v6 := map[string]any{"address": "fd00:10:244:1::7/64", "interface": 0}
	if strings.HasPrefix(version, "0.") {
		v4["version"] = "4"
		v6["version"] = "6"
	}
	return map[string]any{
		"cniVersion": version,
		"interfaces": []any{map[string]any{"name": "eth0", "mac": "0a:58:0a:f4:01:07", "sandbox": testNetns}},
		"ips":        []any{v4, v6},
		"routes":     []any{map[string]any{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}},
		"dns":        map[string]any{"nameservers": []any{"10.96.0.10"}},
	}
}

func netConfOf(version string, extra map[string]any) map[string]any {
	conf := map[string]any{
		"cniVersion": version,
		"name":       "kindnet",
		"type":       "ztunnel-redirect-cni",
		"prevResult": prevResultOf(version),
	}
	for k, v := range extra {
		conf[k] = v
	}
	return conf
}

type outcome struct {
	status int
	out    string
	log    string
}

func (o outcome) json(t *testing.T) map[string]any {
	t.Helper()
	var v map[string]any
	if err := json.Unmarshal([]byte(o.out), &v); err != nil {
		t.Fatalf("stdout is not a JSON object: %q (log: %s)", o.out, o.log)
	}
	return v
}

// runWith runs one command as the runtime would, the pod's CNI_ARGS included.
func runWith(t *testing.T, command string, stdin any, env map[string]string) outcome {
	t.Helper()
	o, _ := runLogged(t, command, stdin, env)
	return o
}

// runLogged is runWith that also returns the logger, holding the lines for the agent's log.
func runLogged(t *testing.T, command string, stdin any, env map[string]string) (outcome, *logger) {
	t.Helper()
	var data []byte
	switch s := stdin.(type) {
	case []byte:
		data = s
	case string:
		data = []byte(s)
	default:
		var err error
		if data, err = json.Marshal(s); err != nil {
			t.Fatal(err)
		}
	}
	full := map[string]string{
		"CNI_COMMAND":     command,
		"CNI_CONTAINERID": "6f1e2d3c",
		"CNI_NETNS":       testNetns,
		"CNI_IFNAME":      "eth0",
		"CNI_ARGS":        "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0",
		"CNI_PATH":        "/opt/cni/bin",
	}
	for k, v := range env {
		if v == "" {
			delete(full, k)
		} else {
			full[k] = v
		}
	}
	var stderr bytes.Buffer
	log := newLogger(&stderr)
	status, out := run(full, bytes.NewReader(data), log)
	return outcome{status, out, stderr.String()}, log
}

func absentSocket(t *testing.T) string { return filepath.Join(t.TempDir(), "pluginevent.sock") }

func assertError(t *testing.T, o outcome, code int, version string) map[string]any {
	t.Helper()
	if o.status == 0 {
		t.Fatalf("expected a failure, got status 0 and %q", o.out)
	}
	e := o.json(t)
	if len(e) != 4 || e["msg"] == nil || e["details"] == nil {
		t.Errorf("error object %v does not have exactly cniVersion, code, msg, details", e)
	}
	if int(e["code"].(float64)) != code || e["cniVersion"] != version {
		t.Errorf("error %v: want code %d in version %s", e, code, version)
	}
	return e
}

func TestVersionReportsSupportedVersions(t *testing.T) {
	for _, v := range supportedVersions {
		o := runWith(t, "VERSION", map[string]any{"cniVersion": v}, nil)
		if o.status != 0 || o.out != `{"cniVersion":"`+v+`","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}` {
			t.Errorf("VERSION %s: %d %q", v, o.status, o.out)
		}
	}
}

func TestVersionWithoutUsableConfigAnswersLatest(t *testing.T) {
	for _, stdin := range []string{"", "{not json", `{"cniVersion":"0.2.0"}`, `{"cniVersion":1}`, strings.Repeat(" ", maxStdin+1)} {
		o := runWith(t, "VERSION", stdin, nil)
		if o.status != 0 || o.json(t)["cniVersion"] != latestVersion {
			t.Errorf("VERSION with %.20q: %d %q", stdin, o.status, o.out)
		}
	}
}

func TestDelAlwaysSucceedsSilently(t *testing.T) {
	for _, stdin := range []any{
		"", "{not json", "[]", strings.Repeat("[", 20000), strings.Repeat(" ", maxStdin+1),
		netConfOf("0.2.0", nil), netConfOf("9.9.9", nil),
		netConfOf("1.0.0", map[string]any{"exclude_namespaces": "kube-system"}),
		netConfOf("1.0.0", map[string]any{"plugin_event_socket": absentSocket(t)}),
	} {
		if o := runWith(t, "DEL", stdin, nil); o.status != 0 || o.out != "" {
			t.Errorf("DEL with %.40v: %d %q", stdin, o.status, o.out)
		}
	}
}

func TestCheckExistsFrom040On(t *testing.T) {
	for _, v := range supportedVersions {
		o := runWith(t, "CHECK", netConfOf(v, map[string]any{"plugin_event_socket": absentSocket(t)}), nil)
		if compareVersions(v, "0.4.0") >= 0 {
			if o.status != 0 || o.out != "" {
				t.Errorf("CHECK %s: %d %q", v, o.status, o.out)
			}
			continue
		}
		// As containernetworking/cni's skel: "config version does not allow CHECK" (code 1).
		if e := assertError(t, o, codeIncompatibleVersion, v); !strings.Contains(e["msg"].(string), "CHECK") {
			t.Errorf("CHECK %s: %v", v, e)
		}
	}
}

func TestGCExistsFrom110OnAndStatusAlways(t *testing.T) {
	assertError(t, runWith(t, "GC", netConfOf("1.0.0", nil), nil), codeIncompatibleVersion, "1.0.0")
	if o := runWith(t, "GC", netConfOf("1.1.0", nil), nil); o.status != 0 || o.out != "" {
		t.Errorf("GC 1.1.0: %d %q", o.status, o.out)
	}
	for _, v := range supportedVersions {
		if o := runWith(t, "STATUS", netConfOf(v, nil), nil); o.status != 0 || o.out != "" {
			t.Errorf("STATUS %s: %d %q", v, o.status, o.out)
		}
	}
}

func TestMalformedStdinIsError7InTheLatestVersion(t *testing.T) {
	for _, stdin := range []string{
		"", "{not json", "[]", `"a string"`, "null", "42",
		strings.Repeat("[", 20000) + strings.Repeat("]", 20000),
		`{"a":` + strings.Repeat(`{"a":`, 20000) + "1" + strings.Repeat("}", 20001),
	} {
		for _, command := range []string{"ADD", "CHECK", "GC", "STATUS", "FROB", ""} {
			assertError(t, runWith(t, command, stdin, map[string]string{"CNI_COMMAND": command}), codeInvalidConfig, latestVersion)
		}
	}
}

func TestHugeStdinIsError7(t *testing.T) {
	conf, _ := json.Marshal(netConfOf("1.0.0", map[string]any{"padding": strings.Repeat("x", maxStdin)}))
	e := assertError(t, runWith(t, "ADD", conf, nil), codeInvalidConfig, latestVersion)
	if !strings.Contains(e["msg"].(string), "larger than") {
		t.Errorf("%v", e)
	}
}

func TestWrongTypesOfOurKeysAreError7InTheRequestedVersion(t *testing.T) {
	for key, value := range map[string]any{
		"exclude_namespaces":  "kube-system",
		"plugin_event_socket": 7,
		"log_level":           nil,
		"cniVersion":          false,
		"name":                []any{},
		"prevResult":          "x",
	} {
		conf := netConfOf("0.4.0", map[string]any{key: value})
		version := "0.4.0"
		if key == "cniVersion" {
			version = latestVersion
		}
		e := assertError(t, runWith(t, "ADD", conf, nil), codeInvalidConfig, version)
		if !strings.Contains(e["msg"].(string), key) {
			t.Errorf("%s: %v", key, e)
		}
	}
	conf := netConfOf("1.0.0", map[string]any{"exclude_namespaces": []any{"a", nil}})
	assertError(t, runWith(t, "ADD", conf, nil), codeInvalidConfig, "1.0.0")
}

func TestOlderPluginKeysAreIgnored(t *testing.T) {
	// An entry written by the Python plugin's installer still works with this executable.
	conf := netConfOf("1.0.0", map[string]any{
		"kubeconfig": "/etc/cni/net.d/ZZZ-ztunnel-redirect-cni-kubeconfig", "system_namespace": "istio-system",
		"agent_namespace": "istio-system", "agent_labels": map[string]any{"app": "ztunnel-redirect"},
		"exclude_namespaces": []any{"shop"},
	})
	if o := runWith(t, "ADD", conf, nil); o.status != 0 {
		t.Errorf("%d %q", o.status, o.out)
	}
}

func TestUnsupportedVersionIsError1InTheRequestedVersion(t *testing.T) {
	for _, v := range []string{"0.2.0", "1.2.0", ""} {
		want := v
		if v == "" {
			want = latestVersion
		}
		e := assertError(t, runWith(t, "ADD", netConfOf(v, nil), nil), codeIncompatibleVersion, want)
		if !strings.Contains(e["msg"].(string), `"`+v+`"`) {
			t.Errorf("%s: %v", v, e)
		}
	}
}

func TestUnknownOrMissingCommandIsError4(t *testing.T) {
	assertError(t, runWith(t, "FROB", netConfOf("1.0.0", nil), nil), codeInvalidEnvironment, "1.0.0")
	e := assertError(t, runWith(t, "", netConfOf("1.0.0", nil), map[string]string{"CNI_COMMAND": ""}), codeInvalidEnvironment, "1.0.0")
	if !strings.Contains(e["msg"].(string), "CNI_COMMAND") {
		t.Errorf("%v", e)
	}
}

func TestAddWithoutNetnsIsError4(t *testing.T) {
	conf := netConfOf("1.0.0", map[string]any{"plugin_event_socket": absentSocket(t)})
	e := assertError(t, runWith(t, "ADD", conf, map[string]string{"CNI_NETNS": ""}), codeInvalidEnvironment, "1.0.0")
	if !strings.Contains(e["msg"].(string), "CNI_NETNS") {
		t.Errorf("%v", e)
	}
}

func TestBadPrevResultAddressesAreError7(t *testing.T) {
	for _, ips := range []any{"x", []any{"10.0.0.1"}, []any{map[string]any{"address": "nope"}}, []any{map[string]any{}}} {
		prev := prevResultOf("1.0.0")
		prev["ips"] = ips
		conf := netConfOf("1.0.0", map[string]any{"prevResult": prev, "plugin_event_socket": absentSocket(t)})
		assertError(t, runWith(t, "ADD", conf, nil), codeInvalidConfig, "1.0.0")
	}
}

func TestPodIPs(t *testing.T) {
	ips, err := podIPs(json.RawMessage(`{"ips":[{"address":"10.244.1.7/24"},{"address":"FD00:10:244:1:0:0:0:7/64"},{"address":"10.0.0.9"}]}`))
	if err != nil || strings.Join(ips, ",") != "10.244.1.7,fd00:10:244:1::7,10.0.0.9" {
		t.Errorf("%v %v", ips, err)
	}
	for _, prev := range []string{`{}`, `{"ips":null}`, `{"ips":[]}`} {
		if ips, err := podIPs(json.RawMessage(prev)); err != nil || len(ips) != 0 || ips == nil {
			t.Errorf("%s: %#v %v", prev, ips, err)
		}
	}
}

func TestParseCNIArgs(t *testing.T) {
	args := parseCNIArgs(" IgnoreUnknown=1; K8S_POD_NAME = web-0 ;K8S_POD_NAMESPACE=shop;junk;=x;K8S_POD_UID=")
	want := map[string]string{"IgnoreUnknown": "1", "K8S_POD_NAME": "web-0", "K8S_POD_NAMESPACE": "shop", "K8S_POD_UID": ""}
	if len(args) != len(want) {
		t.Fatalf("%v", args)
	}
	for k, v := range want {
		if args[k] != v {
			t.Errorf("%s: %q", k, args[k])
		}
	}
}

func TestResultIsPrevResultUnchangedOrVersioned(t *testing.T) {
	conf := &netConf{cniVersion: "1.1.0", prevResult: json.RawMessage("{ \"cniVersion\" : \"1.0.0\",\n \"ips\": [] }")}
	if got := result(conf); got != `{"cniVersion":"1.0.0","ips":[]}` {
		t.Errorf("%s", got)
	}
	conf.prevResult = json.RawMessage(`{"ips":[{"address":"10.0.0.1/24"}]}`)
	if got := result(conf); got != `{"cniVersion":"1.1.0","ips":[{"address":"10.0.0.1/24"}]}` {
		t.Errorf("%s", got)
	}
	conf.prevResult = nil
	if got := result(conf); got != `{"cniVersion":"1.1.0"}` {
		t.Errorf("%s", got)
	}
}

func TestCompareVersions(t *testing.T) {
	for _, c := range []struct {
		a, b string
		want int
	}{{"0.3.1", "0.4.0", -1}, {"0.4.0", "0.4.0", 0}, {"1.0.0", "0.4.0", 1}, {"0.10.0", "0.4.0", 1}, {"1.1", "1.1.0", 0}} {
		if got := compareVersions(c.a, c.b); got != c.want {
			t.Errorf("compare(%s, %s) = %d", c.a, c.b, got)
		}
	}
}

func TestPanicBecomesAnErrorObject(t *testing.T) {
	var log bytes.Buffer
	status, out := run(map[string]string{"CNI_COMMAND": "ADD"}, panicReader{}, newLogger(&log))
	if status != 1 || !strings.Contains(out, `"code":999`) || !strings.Contains(out, "internal error") {
		t.Errorf("%d %q", status, out)
	}
	status, out = run(map[string]string{"CNI_COMMAND": "DEL"}, panicReader{}, newLogger(&log))
	if status != 0 || out != "" {
		t.Errorf("DEL: %d %q", status, out)
	}
}

type panicReader struct{}

func (panicReader) Read([]byte) (int, error) { panic(errors.New("boom")) }

func TestConfigDefaults(t *testing.T) {
	// Copies of ztunnel_redirect/core/constants.py: CNI_AGENT_RUN_DIR/PLUGIN_EVENT_SOCKET and
	// EXCLUDE_NAMESPACES (tests/test_cni_plugin_binary.py checks the latter against the package).
	conf, err := parseNetConf(map[string]json.RawMessage{"cniVersion": json.RawMessage(`"1.0.0"`)})
	if err != nil {
		t.Fatal(err)
	}
	if conf.eventSocket != "/var/run/istio-cni/pluginevent.sock" || conf.logLevel != "info" ||
		strings.Join(conf.excludeNamespaces, ",") != "kube-system" || conf.prevResult != nil {
		t.Errorf("%+v", conf)
	}
}

package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
)

// Native fuzz targets over everything the plugin takes from outside: the network config on
// stdin, the environment the runtime sets, the decision file and the agent's HTTP answer.
// `go test` runs the seeds below; `make fuzz` runs each target for a bounded -fuzztime.

// fuzzCommands are the CNI_COMMAND values tried: every command and some no runtime sends.
var fuzzCommands = []string{"ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION", "", "add", "ADD\x00"}

func deeplyNested(opener, closer string, depth int) []byte {
	return []byte(strings.Repeat(opener, depth) + "1" + strings.Repeat(closer, depth))
}

// stdinSeeds are valid configs of each version, wrong types, huge and deeply nested documents.
func stdinSeeds(t testing.TB) [][]byte {
	seeds := [][]byte{
		[]byte(`{"cniVersion":"1.0.0","name":"k","prevResult":{"ips":[{"address":"10.0.0.1/24"}]}}`),
		[]byte(`{"cniVersion":"0.3.1","prevResult":{"ips":[{"address":"zz"}]}}`),
		[]byte(`{"cniVersion":1,"exclude_namespaces":"kube-system"}`),
		[]byte(`{"cniVersion":"1.1.0","prevResult":{"ips":null},"log_level":["debug"]}`),
		[]byte(`null`), []byte(`[]`), []byte(`"x"`), []byte(`{`), []byte{0xff, 0xfe},
		deeplyNested("[", "]", 20000),
		deeplyNested(`{"prevResult":`, "}", 20000),
		bytes.Repeat([]byte(" "), maxStdin+1),
	}
	for _, version := range []string{"0.3.1", "0.4.0", "1.0.0", "1.1.0"} {
		data, err := json.Marshal(netConfOf(version, nil))
		if err != nil {
			t.Fatal(err)
		}
		seeds = append(seeds, data)
	}
	return seeds
}

// FuzzRun runs each command on any stdin, CNI_ARGS and CNI_NETNS: the plugin answers status 0, or status 1
// with a CNI error object, never a Go panic (run turns one into "internal error"). The agent's
// socket is always an absent one in a temporary directory, so ADD falls back to the (absent)
// decision file and no fuzzed path is ever connected to.
func FuzzRun(f *testing.F) {
	for i, seed := range stdinSeeds(f) {
		f.Add(uint8(i), seed, "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0", testNetns)
	}
	f.Add(uint8(0), []byte(`{"cniVersion":"1.0.0"}`), ";;=;K8S_POD_NAME=;K8S_POD_NAMESPACE", "")
	socket := filepath.Join(f.TempDir(), "pluginevent.sock")
	f.Fuzz(func(t *testing.T, which uint8, stdin []byte, cniArgs, netns string) {
		command := fuzzCommands[int(which)%len(fuzzCommands)]
		var raw map[string]json.RawMessage
		if json.Unmarshal(stdin, &raw) == nil && raw != nil {
			raw["plugin_event_socket"], _ = json.Marshal(socket)
			stdin, _ = json.Marshal(raw)
		}
		env := map[string]string{
			"CNI_COMMAND": command, "CNI_CONTAINERID": "c", "CNI_NETNS": netns,
			"CNI_IFNAME": "eth0", "CNI_ARGS": cniArgs, "CNI_PATH": "/opt/cni/bin",
		}
		var log bytes.Buffer
		status, out := run(env, bytes.NewReader(stdin), newLogger(&log))
		if strings.Contains(log.String(), "internal error") {
			t.Fatalf("the plugin panicked on %q: %s", stdin, log.String())
		}
		switch {
		case status == 0 && command == "DEL":
			if out != "" {
				t.Fatalf("DEL printed %q", out)
			}
		case status == 0:
		case status == 1:
			var e map[string]any
			if err := json.Unmarshal([]byte(out), &e); err != nil || e["code"] == nil || e["msg"] == nil {
				t.Fatalf("failure without a CNI error object: %q", out)
			}
		default:
			t.Fatalf("status %d", status)
		}
	})
}

// FuzzParseDecisions: any decision file is either rejected with an error or gives a table whose
// lookups work for any pod.
func FuzzParseDecisions(f *testing.F) {
	good, err := json.Marshal(decisionFileOf(map[string]any{testUID: podEntry("shop", "web-0", true)}))
	if err != nil {
		f.Fatal(err)
	}
	for _, seed := range [][]byte{
		good, []byte(`{"version":1}`), []byte(`{"version":"1"}`), []byte(`{"version":1,"pods":[]}`),
		[]byte(`{"version":1,"exclude_namespaces":[],"enrolled_namespaces":[],"agent_pods":[{}],"pods":{}}`),
		deeplyNested(`{"pods":`, "}", 20000), []byte(`null`), []byte{0},
	} {
		f.Add(seed, "shop", "web-0", testUID)
	}
	f.Fuzz(func(t *testing.T, data []byte, namespace, name, uid string) {
		d, err := parseDecisions(data)
		if err != nil {
			if d != nil {
				t.Fatal("an error and a table")
			}
			return
		}
		pod := podRef{namespace: namespace, name: name, uid: uid}
		d.isAgentPod(pod)
		d.lookup(pod)
	})
}

// FuzzReadResponse: whatever answers on the agent's socket, the plugin reads a status and a
// reason or an error, without panicking or reading without end.
func FuzzReadResponse(f *testing.F) {
	for _, seed := range []string{
		"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
		"HTTP/1.1 400 Bad Request\r\nContent-Length: 11\r\n\r\nbad pod uid",
		"HTTP/1.1 500 x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
		"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "HTTP/1.1\r\n\r\n", "", "\x00\xff",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		status, _, _, err := readResponse(bufio.NewReader(bytes.NewReader(data)))
		if err == nil && (status < 100 || status > 999) {
			t.Fatalf("status %d accepted from %q", status, data)
		}
	})
}

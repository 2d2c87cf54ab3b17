module ztunnel-redirect/cniplugin

go 1.19
